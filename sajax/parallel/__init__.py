"""The floor: the device mesh (data × fsdp × tensor), logical-axis rules and NamedShardings (`sharding`), and the
start-up and checks of a multi-process job (`distributed`). Imports nothing else of sajax."""
