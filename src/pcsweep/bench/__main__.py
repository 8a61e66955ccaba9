from pcsweep.bench.tables import main

main()
