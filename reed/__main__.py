from reed.cli import main

raise SystemExit(main())
