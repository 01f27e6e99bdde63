from coordinator.cli import main

main(prog_name="shardkeeper")
