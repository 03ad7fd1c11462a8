from megatron_yuyuan.cli.serve import main

raise SystemExit(main())
