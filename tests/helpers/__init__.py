"""What the test folders share that is not a fixture: tiny models and runs, images, servers, protocol clients."""
