from services.speech.asr.main import run

run()
