from services.speech.tts.main import run

run()
