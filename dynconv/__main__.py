from dynconv.cli import main

raise SystemExit(main())
