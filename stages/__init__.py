"""The pipeline's verbs: one module per dvc.yaml stage, each a run(cfg, paths) with a thin main()."""
