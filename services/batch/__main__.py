from services.batch.main import run

run()
