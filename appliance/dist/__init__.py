"""What the appliance installs beside itself: engine images and offline bundles."""
