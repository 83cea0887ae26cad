from polystore.cli import main

main()
