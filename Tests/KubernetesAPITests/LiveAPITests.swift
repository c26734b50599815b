import Foundation
import KubeObjects
import NIOSSL
import Testing
@testable import KubernetesAPI

/// `KubernetesSource.load` against a real HTTPS server on 127.0.0.1 (swift-nio + NIOSSL), with certificates
/// made at test time.
@Suite("Kubernetes API: live lists over HTTPS")
struct LiveAPITests {
    let pki = PKI.shared

    @Test("bearer token, CA file, paged lists: the objects equal the same objects read from a file")
    func pagedListsEqualFile() async throws {
        let cluster = FakeCluster.standard
        let server = try await TestAPIServer.start(handler: serving(cluster))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig("kube/config", server: server.url)

        let objects = try await KubernetesSource.load(.init(kubeconfig: config), environment: ws.environment())

        let fromFile = try DocumentLoader.load(Array(cluster.listFile.utf8), source: "cluster.json")
        #expect(objects == fromFile)
        #expect(objects.services.count == 5 && objects.endpointSlices.count == 5)
        // 5 services and 5 slices in pages of 2: 3 requests each, every one with limit=500.
        let paths = server.paths
        #expect(paths.count == 6)
        #expect(server.requests.allSatisfy { $0.query["limit"] == "500" })
        #expect(paths[0] == "/api/v1/services?limit=500")
        #expect(paths[1] == "/api/v1/services?limit=500&continue=g1%2Boff%2F2%3D%3D")
        #expect(paths[3] == "/apis/discovery.k8s.io/v1/endpointslices?limit=500")
        #expect(server.requests.allSatisfy { $0.headers["accept"] == "application/json" })
    }

    @Test("an expired continue token (410) restarts the list and nothing is counted twice")
    func expiredContinueRelists() async throws {
        let cluster = FakeCluster.standard
        // The first time a continue token of generation 1 is presented, the server has compacted: 410.
        // After that it serves generation 2.
        let generation = Box(1)
        let server = try await TestAPIServer.start { r in
            guard r.authorization == "Bearer \(testToken)" else { return .json(401, status(401, "Unauthorized", "Unauthorized")) }
            if r.path == "/api/v1/services", let c = r.query["continue"], c.hasPrefix("g1"), generation.get() == 1 {
                generation.set(2)
                return .json(410, status(410, "Expired", "The provided continue parameter is too old to display a consistent list result."))
            }
            return cluster.reply(r, generation: generation.get())!
        }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.write("config", kubeconfig(server: server.url,
            clusterFields: "certificate-authority-data: \(pki.base64(pki.caCert))", userFields: "token: \(testToken)"))

        let objects = try await KubernetesSource.load(.init(kubeconfig: config), environment: ws.environment())
        #expect(sortedNames(objects) == sortedNames(try DocumentLoader.load(Array(cluster.listFile.utf8), source: "f")))
        #expect(objects.services.count == 5)
        let servicePaths = server.paths.filter { $0.hasPrefix("/api/v1/services") }
        #expect(servicePaths == [
            "/api/v1/services?limit=500",
            "/api/v1/services?limit=500&continue=g1%2Boff%2F2%3D%3D",  // 410
            "/api/v1/services?limit=500",                              // relist from the start
            "/api/v1/services?limit=500&continue=g2%2Boff%2F2%3D%3D",
            "/api/v1/services?limit=500&continue=g2%2Boff%2F4%3D%3D",
        ])
    }

    @Test("a continue token that keeps expiring ends in one unpaged list")
    func repeatedExpiryFallsBackToFullList() async throws {
        let cluster = FakeCluster.standard
        let server = try await TestAPIServer.start { r in
            if r.query["continue"] != nil {
                return .json(410, status(410, "Expired", "The provided continue parameter is too old"))
            }
            return cluster.reply(r)!
        }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let objects = try await KubernetesSource.load(.init(kubeconfig: config), environment: ws.environment())
        #expect(objects.services.count == 5 && objects.endpointSlices.count == 5)
        #expect(server.paths.filter { $0.hasPrefix("/api/v1/services") }.last == "/api/v1/services")
    }

    @Test("namespaces are fetched one by one; the label selector goes to the server for services only")
    func namespacesAndSelector() async throws {
        let server = try await TestAPIServer.start(handler: serving(.standard))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let options = KubernetesSourceOptions(kubeconfig: config, namespaces: ["default", "shop"], labelSelector: "tier=front")
        let objects = try await KubernetesSource.load(options, environment: ws.environment())
        #expect(objects.services.map(\.id.description).sorted() == ["default/web", "shop/api"])
        // Only the slices of the selected services are kept.
        #expect(objects.endpointSlices.map(\.id.description).sorted() == ["default/web-x1", "shop/api-q9"])
        #expect(server.paths == [
            "/api/v1/namespaces/default/services?labelSelector=tier%3Dfront&limit=500",
            "/api/v1/namespaces/shop/services?labelSelector=tier%3Dfront&limit=500",
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?limit=500",
            "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?limit=500&continue=g1%2Boff%2F2%3D%3D",
            "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices?limit=500",
        ])
    }

    @Test("client certificate and key (mTLS), no token")
    func clientCertificateAuth() async throws {
        let clientCert = try NIOSSLCertificate.fromPEMFile(pki.clientCert)[0]
        let cluster = FakeCluster.standard
        let server = try await TestAPIServer.start(clientCA: pki.caCert) { r in
            guard r.clientCertificate == clientCert, r.authorization == nil else {
                return .json(401, status(401, "Unauthorized", "Unauthorized"))
            }
            return cluster.reply(r)!
        }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        // Data for the certificate, a relative file for the key.
        try ws.write("kube/pki/client.key", pki.read(pki.clientKey))
        let config = try ws.write("kube/config", kubeconfig(server: server.url,
            clusterFields: "certificate-authority: \(pki.caCert)",
            userFields: "client-certificate-data: \(pki.base64(pki.clientCert))\nclient-key: pki/client.key"))
        let objects = try await KubernetesSource.load(.init(kubeconfig: config), environment: ws.environment())
        #expect(objects.services.count == 5)

        // The same server without a certificate: 401, exit 77.
        let noCert = try ws.write("kube/nocert", kubeconfig(server: server.url,
            clusterFields: "certificate-authority: \(pki.caCert)", userFields: "username: nobody\npassword: hunter2-pw"))
        let error = try #require(await loadError(.init(kubeconfig: noCert), ws.environment()))
        #expect(error.exitCode == 77)
        #expect(error.description.contains("unauthorized"))
        #expect(!error.description.contains("hunter2-pw"))
    }

    @Test("403 with a Status body: exit 77, names verb and resource, shows the server's message, never the token")
    func forbidden() async throws {
        let server = try await TestAPIServer.start { r in
            let resource = r.path.hasSuffix("endpointslices") ? "endpointslices" : "services"
            let group = resource == "services" ? "\"\"" : "\"discovery.k8s.io\""
            return .json(403, status(403, "Forbidden",
                "\(resource) is forbidden: User \"system:serviceaccount:kube-system:hostnet-dnat\" cannot list resource \"\(resource)\" in API group \(group) at the cluster scope (token \(testToken))",
                details: "{\"kind\":\"\(resource)\"}"))
        }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let error = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(error.exitCode == 77)
        #expect(error.httpStatus == 403)
        let text = error.description
        #expect(text.contains("forbidden: kubeconfig user \"admin\" cannot list services in all namespaces"))
        #expect(text.contains("cannot list resource \\\"services\\\"") || text.contains("cannot list resource \"services\""))
        #expect(text.contains("grant list on services (see examples/deploy/rbac.yaml)"))
        #expect(!text.contains(testToken))
        #expect(text.contains("<redacted>"))
    }

    @Test("403 on endpointslices in one namespace names the API group and the namespace")
    func forbiddenSlicesInNamespace() async throws {
        let cluster = FakeCluster.standard
        let server = try await TestAPIServer.start { r in
            if r.path.contains("endpointslices") {
                return .json(403, status(403, "Forbidden", "endpointslices.discovery.k8s.io is forbidden"))
            }
            return cluster.reply(r)!
        }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let error = try #require(await loadError(.init(kubeconfig: config, namespaces: ["shop"]), ws.environment()))
        #expect(error.exitCode == 77)
        #expect(error.description.contains("cannot list endpointslices in namespace \"shop\""))
        #expect(error.description.contains("grant list on endpointslices in API group discovery.k8s.io"))
        #expect(error.description.contains("endpointslices.discovery.k8s.io is forbidden"))
    }

    @Test("401: exit 77, and the token never appears")
    func unauthorized() async throws {
        let server = try await TestAPIServer.start(handler: serving(.standard, token: "another-token"))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let error = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(error.exitCode == 77)
        #expect(error.description.contains("unauthorized: the API server at \(server.url)"))
        #expect(!error.description.contains(testToken))
    }

    @Test("a server that never answers: timeout, exit 69, names the URL")
    func hangingServerTimesOut() async throws {
        let server = try await TestAPIServer.start { _ in .hang }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let start = ContinuousClock.now
        let error = try #require(await loadError(.init(kubeconfig: config, requestTimeout: .milliseconds(600)), ws.environment()))
        let elapsed = ContinuousClock.now - start
        #expect(error.exitCode == 69)
        #expect(error.description.contains(server.url))
        #expect(error.description.contains("no answer within 0.6s"))
        #expect(elapsed < .seconds(5))
        #expect(!error.description.contains(testToken))
    }

    @Test("a server whose certificate another CA signed is refused: exit 69, TLS named")
    func wrongCA() async throws {
        let server = try await TestAPIServer.start(certificate: pki.otherServerCert, key: pki.otherServerKey,
                                                   handler: serving(.standard))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let error = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(error.exitCode == 69)
        #expect(error.description.contains(server.url))
        #expect(error.description.contains("TLS failure: the server's certificate is not signed by the cluster CA from \(pki.caCert)"))
        #expect(server.requests.isEmpty, "no request (and so no token) may reach an unverified server")

        // insecure-skip-tls-verify: true is the only way past it.
        let insecure = try ws.write("insecure", kubeconfig(server: server.url,
            clusterFields: "insecure-skip-tls-verify: true", userFields: "token: \(testToken)"))
        let objects = try await KubernetesSource.load(.init(kubeconfig: insecure), environment: ws.environment())
        #expect(objects.services.count == 5)
    }

    @Test("tls-server-name: the certificate is checked against that name, not the address")
    func tlsServerName() async throws {
        // A certificate for kubernetes.default.svc only: reaching it as 127.0.0.1 needs tls-server-name.
        let server = try await TestAPIServer.start(certificate: pki.namedServerCert, key: pki.namedServerKey,
                                                   handler: serving(.standard))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let good = try ws.write("good", kubeconfig(server: server.url,
            clusterFields: "certificate-authority: \(pki.caCert)\ntls-server-name: kubernetes.default.svc",
            userFields: "token: \(testToken)"))
        let objects = try await KubernetesSource.load(.init(kubeconfig: good), environment: ws.environment())
        #expect(objects.services.count == 5)
        let bad = try ws.write("bad", kubeconfig(server: server.url,
            clusterFields: "certificate-authority: \(pki.caCert)\ntls-server-name: not-the-apiserver.example",
            userFields: "token: \(testToken)"))
        let error = try #require(await loadError(.init(kubeconfig: bad), ws.environment()))
        #expect(error.exitCode == 69)
        #expect(error.description.contains("not valid for not-the-apiserver.example"))
        #expect(error.description.contains(server.url))
        let none = try ws.write("none", kubeconfig(server: server.url,
            clusterFields: "certificate-authority: \(pki.caCert)", userFields: "token: \(testToken)"))
        let noName = try #require(await loadError(.init(kubeconfig: none), ws.environment()))
        #expect(noName.description.contains("not valid for 127.0.0.1"))
        #expect(server.requests.count == 6, "only the run with the right name gets past TLS")
    }

    @Test("nothing listening: connection refused, exit 69")
    func connectionRefused() async throws {
        let port = try await closedPort()
        let ws = try Workspace()
        let config = try ws.write("config", kubeconfig(server: "https://127.0.0.1:\(port)",
            clusterFields: "certificate-authority: \(pki.caCert)", userFields: "token: \(testToken)"))
        let error = try #require(await loadError(.init(kubeconfig: config, requestTimeout: .seconds(5)), ws.environment()))
        #expect(error.exitCode == 69)
        #expect(error.description.contains("https://127.0.0.1:\(port)"))
        #expect(error.description.contains("connection refused"))
    }

    @Test("a name that does not resolve: exit 69, names the host")
    func dnsFailure() async throws {
        let ws = try Workspace()
        let config = try ws.write("config", kubeconfig(server: "https://api.does-not-exist.invalid:6443",
            clusterFields: "certificate-authority: \(pki.caCert)", userFields: "token: \(testToken)"))
        let error = try #require(await loadError(.init(kubeconfig: config, requestTimeout: .seconds(5)), ws.environment()))
        #expect(error.exitCode == 69)
        #expect(error.description.contains("https://api.does-not-exist.invalid:6443"))
        #expect(error.description.contains("api.does-not-exist.invalid"))
    }

    @Test("a 200 that is not a Kubernetes list: exit 65")
    func badData() async throws {
        let server = try await TestAPIServer.start { _ in .raw(200, contentType: "text/html", "<html>login</html>") }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let error = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(error.exitCode == 65)
        #expect(error.description.contains("\(server.url)/api/v1/services: the API server's answer is not JSON"))
    }

    @Test("a 200 with the wrong kind: exit 65")
    func wrongKind() async throws {
        let server = try await TestAPIServer.start { _ in .json(200, #"{"kind":"PodList","apiVersion":"v1","metadata":{},"items":[]}"#) }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let error = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(error.exitCode == 65)
        #expect(error.description.hasSuffix("expected a ServiceList, got kind PodList"))
    }

    @Test("429 with Retry-After is retried; a 500 Status is exit 69 with the server's message")
    func retryAndServerError() async throws {
        let cluster = FakeCluster.standard
        let throttled = Box(false)
        let server = try await TestAPIServer.start { r in
            if r.path.contains("endpointslices") {
                return .json(500, status(500, "InternalError", "Internal error occurred: etcdserver: request timed out"))
            }
            if !throttled.get() {
                throttled.set(true)
                return .jsonHeaders(429, status(429, "TooManyRequests", "Too many requests, please try again later."),
                                    ["Retry-After": "1"])
            }
            return cluster.reply(r)!
        }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let error = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(error.exitCode == 69)
        #expect(error.description.contains("HTTP 500 InternalError: Internal error occurred: etcdserver: request timed out"))
        // The 429 was retried after its Retry-After, then the three pages of services were read.
        #expect(server.paths.filter { $0.hasPrefix("/api/v1/services") }.count == 4)
    }

    @Test("an invalid object in a page: exit 65 naming the URL, the object and the field")
    func invalidObject() async throws {
        var cluster = FakeCluster.standard
        cluster.services[2].body = #""spec":{"clusterIP":"192.0.2.20","externalIPs":["198.51.100.999"],"ports":[{"port":80}]}"#
        let server = try await TestAPIServer.start(handler: serving(cluster))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        let config = try ws.tokenKubeconfig(server: server.url)
        let error = try #require(await loadError(.init(kubeconfig: config), ws.environment()))
        #expect(error.exitCode == 65)
        #expect(error.description.contains("\(server.url)/api/v1/services: Service shop/api: spec.externalIPs[0]"))
    }
}
