from vqext.cli import main

main()
