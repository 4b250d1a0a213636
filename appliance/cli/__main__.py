"""`python -m appliance.cli`: the `appliance` command."""

from appliance.cli.main import main

main()
