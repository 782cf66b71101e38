"""Speech workers: ASR (faster-whisper) and TTS (hibari-tts)."""
