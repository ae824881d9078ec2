from modelfs.cli import main

main()
