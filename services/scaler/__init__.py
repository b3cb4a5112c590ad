"""The scaler: applies each model's scaling policy by asking node providers for nodes and releasing them."""
