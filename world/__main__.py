"""python -m world build-policy | build-judge | deepen | arms | compare-arms ...: see world/build.py and world/cleaning.py."""
import data
from world.build import main

data.run_cli(main)
