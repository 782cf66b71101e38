from services.vision.main import run

run()
