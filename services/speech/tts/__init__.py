"""TTS worker: text in, 16-bit PCM out, sentence by sentence over the bus (`python -m services.speech.tts`)."""
