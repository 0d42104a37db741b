"""A vendor's alert webhook made into cockpit alarms: [[servers]] wsgi = "flask_hook:app"."""
from flask import Flask, request

import cockpit

app = Flask(__name__)


@app.post("/alert")
def alert():
    body = request.get_json(silent=True) or {}
    fields = {"service": f"{body.get('host', 'unknown')}!vendor", "method": "vendor", "msg": str(body.get("text", ""))}
    try:
        guid = request.environ["cockpit.publish"]("alarm", fields)
    except cockpit.BusUnavailable:  # the vendor retries a 503
        return {"error": "the cockpit cannot take events right now"}, 503
    except cockpit.EventError as exc:  # names the field that is wrong
        return {"error": str(exc)}, 400
    return {"guid": guid}, 202
