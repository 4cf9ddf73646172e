from deqctl.cli import main

main()
