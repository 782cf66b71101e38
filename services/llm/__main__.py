from services.llm.main import run

run()
