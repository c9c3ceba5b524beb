"""What every layer needs and none of them is about: atomic files, checkpoint files, devices, seeding, config
files, MLflow tracking and progress reports. It imports nothing else from medssl, so data, models, objectives,
train, export and downstream can all stand on it."""
