"""Serving the policy to the robot: the HTTP/WebSocket server and its clients."""
