from services.embed.main import run

run()
