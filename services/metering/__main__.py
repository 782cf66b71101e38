from services.metering.main import run

run()
