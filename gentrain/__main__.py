from .launch.entry import run

run()
