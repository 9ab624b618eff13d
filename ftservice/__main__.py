from ftservice.cli import main

main()
