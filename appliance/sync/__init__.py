"""Store-and-forward sync: outbox, MQTT/HTTPS uplink, fleet agent."""
