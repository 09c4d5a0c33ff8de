from qformer.cli import main

main()
