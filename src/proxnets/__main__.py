from proxnets.cli import main

main()
