"""python -m world build-policy | build-judge | deepen ...: see world/build.py."""
import data
from world.build import main

data.run_cli(main)
