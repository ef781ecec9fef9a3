"""Fleet management at central: enrolment, the fleet store, the MQTT fleet service, commands."""
