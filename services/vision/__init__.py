"""Vision workers: image classification, OCR and image moderation, one engine module each."""
