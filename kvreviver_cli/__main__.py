from kvreviver_cli.app import main

main()
