from dpcore.cli import main

main()
