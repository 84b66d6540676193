"""The web app for subscribers: subscribe, confirm, unsubscribe, preferences."""

from .app import create_app

__all__ = ["create_app"]
