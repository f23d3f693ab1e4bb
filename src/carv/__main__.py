from carv.cli import main

main()
