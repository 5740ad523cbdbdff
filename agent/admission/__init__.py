"""Closed networks: who may announce services, and how a running agent enforces it.

A network is *closed* when ``network.admission_keys`` lists at least one admission key;
docs/SECURITY.md has the trust model. The package is cut by what each part does:

* ``keys``        the admission authority's key (``NetworkKey``), public-key parsing, the
                  canonical msgpack + signature plumbing and the one-line base64 files;
* ``certificate`` ``Certificate``: an admission key (version 1), or an issuer it
                  certified (version 2, the issuer certificate inside), admits one worker
                  key for services;
* ``issuer``      ``IssuerCertificate``: an admission key lets a coordinator's key issue
                  certificates within limits (services, longest lifetime, expiry);
* ``revocation``  ``RevocationList``: worker (or issuer) keys an admission key no longer
                  admits;
* ``policy``      ``AdmissionPolicy``: which records a closed network admits;
* ``settings``    what the config says: trusted keys, this worker's certificate state,
                  where revocation lists come from (shared with ``rma-agent check-config``);
* ``component``   ``NetworkComponent``, component ``"network"``: the policy in a running
                  agent (storage hook, registry and lookup filters, revocation fetching);
* ``enrollment``  the ``POST /api/network/enroll`` protocol (pure): requests, answers;
* ``tokens``      ``TokenStore``: enrollment tokens, hashed, uses counted under a file lock;
* ``enroll_service`` the endpoint on a coordinator's gateway (mounted by its role);
* ``renewal``     the worker's renewal client (``CertRenewer``: at a third of the lifetime
                  left, back-off, atomic install; ``WorkerRenewal``: the task the worker
                  role owns).

The commands (``network-key create``, ``admit``, ``revoke``, ``identity``, ``token``) live
in the command line package. This ``__init__`` imports nothing, so importing a certificate never
pulls in the running component (aiohttp, the component machinery).
"""
