"""The training run: the loop (`loop`), one optimizer step (`step`), the optimizer and schedule
(`optimizer`), the checks before launch (`checks`), continued training (`continued`), the step guard
(`guard`), evaluation during training (`evaluation`, `scoring`), and what it reports (`telemetry`,
`trackers`, `plots`)."""
