from gentrain.launch.entry import run

run()
