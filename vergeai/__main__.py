from vergeai.cli import main

main()
