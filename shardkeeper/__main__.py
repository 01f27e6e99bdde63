from shardkeeper.cli import main

main(prog_name="shardkeeper")
