from modelfs.demo.run import main

main()
