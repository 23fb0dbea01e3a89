from macnat.cli import main

main()
