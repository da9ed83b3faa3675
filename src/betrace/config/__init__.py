"""The settings model: read once, frozen, validated at start-up."""

from betrace.config.settings import Settings, TopicSettings, load_settings, settings_env

__all__ = ["Settings", "TopicSettings", "load_settings", "settings_env"]
