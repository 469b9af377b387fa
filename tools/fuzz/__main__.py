from tools.fuzz.run import main

main()
