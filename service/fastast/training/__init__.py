"""Training side of FastAST: data sets, augmentation, the train and distillation loops, evaluation sweeps."""
