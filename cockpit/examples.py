"""The seed documents' example events (whitespace restored), as examples in the OpenAPI document.

The package ships no data files, so the examples live here; tests/test_web_openapi.py checks
they are the same events as tests/seeds/*.yaml.
"""
from __future__ import annotations

# event type -> example name -> the YAML text a client would send
SEED_YAML: dict[str, dict[str, str]] = {
    "email": {
        "email": 'type: email\nbody: \'\n  this is a test\n\n  can be multiple lines\n\n  \'\nbodytype: md\nattachments: {"aname.doc":"https://stor.something.com:8080/myspacename/aa/bb/aabbccddeeffgghh"}\ncc: []\nfrom: kristof@incubaid.com\nsubject: a subject\n',
    },
    "telegram": {
        "telegram_bp_create": "type: telegram\nio: input\naction: bp.create\nargs:\n name: '1_nodes.yaml'\n content: |\n  here the content of the blueprint\n",
        "telegram_repo_create": "type: telegram\nio: input\naction: repo.create\nargs:\n name: 'env du-conv2'\n",
        "telegram_service_execute": "type: telegram\nio: input\naction: service.execute\nargs:\n name: 'node!cpu1'\n action: 'monitor'\n",
    },
    "alarm": {
        "alarm": "type: 'alarm'\nservice: 'myservice!instance'\nmethod: 'monitor'\nmsg: 'Something wrong happend'\nepoch: 1462275396\n",
    },
    "eco": {
        "eco": "type: 'eco'\nguid : '762d6f24-8b50-4e46-8cb6-fa6d0f56f1fd'\ngid: 1\nnid: 10\npid: 239\napp_name: 'myapp'\neco_type: 'BUG'\nstate: 'NEW'\nerror_msg: 'error internal'\nerror_pub: 'Something went wrong, sorry'\ncategory: 'eco.category'\nfunc_name: 'hello'\nfunc_filename: 'main.py'\nline_nbr: 23\ncode: |\n  from JumpScale import j\n  print('hello world')\nbacktrace: |\n  backtrace here\nextra: 'extra detail'\nlast_time: 1462275396\nclose_time: 1462275496\noccurence: 2\ntags: 'list of tags here'\n",
    },
}
