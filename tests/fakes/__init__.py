"""Loopback fakes of the services this project talks to, for tests."""
