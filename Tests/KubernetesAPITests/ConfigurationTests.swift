import Foundation
import KubeObjects
import Testing
@testable import KubernetesAPI

/// How the server and the credentials are found: exec plugins, in-cluster, KUBECONFIG merging, errors.
/// Every successful case reads from a real HTTPS server on loopback.
@Suite("Kubernetes API: configuration and credentials")
struct ConfigurationTests {
    let pki = PKI.shared

    @Test("exec plugin (v1): relative command, env entries, KUBERNETES_EXEC_INFO, ExecCredential token",
          arguments: ["client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1"])
    func execPlugin(apiVersion: String) async throws {
        let server = try await TestAPIServer.start(handler: serving(.standard, token: "exec-issued-token-42"))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        // The plugin checks what client-go gives it, and records KUBERNETES_EXEC_INFO for the test.
        try ws.write("kube/bin/get-token.sh", """
            #!/bin/sh
            printf '%s' "$KUBERNETES_EXEC_INFO" > "\(ws.path)/exec-info.json"
            [ "$CLUSTER_ALIAS" = "prod-eu" ] || { echo "CLUSTER_ALIAS not passed" >&2; exit 3; }
            [ "$1" = "token" ] && [ "$2" = "--cluster=prod" ] || { echo "bad args: $*" >&2; exit 4; }
            cat <<JSON
            {"kind":"ExecCredential","apiVersion":"\(apiVersion)","spec":{},
             "status":{"token":"exec-issued-token-42","expirationTimestamp":"2030-01-01T00:00:00Z"}}
            JSON

            """, executable: true)
        let config = try ws.write("kube/config", kubeconfig(server: server.url,
            clusterFields: "certificate-authority: \(pki.caCert)",
            userFields: """
                exec:
                  apiVersion: \(apiVersion)
                  command: ./bin/get-token.sh
                  args: ["token", "--cluster=prod"]
                  env:
                  - name: CLUSTER_ALIAS
                    value: prod-eu
                  provideClusterInfo: true
                  interactiveMode: Never
                """))
        let objects = try await KubernetesSource.load(.init(kubeconfig: config), environment: ws.environment())
        #expect(objects.services.count == 5)
        #expect(server.requests.allSatisfy { $0.authorization == "Bearer exec-issued-token-42" })
        let info = try JSONParser.parse(Array(try Data(contentsOf: URL(fileURLWithPath: "\(ws.path)/exec-info.json"))))
        #expect(info["kind"] == .string("ExecCredential"))
        #expect(info["apiVersion"] == .string(apiVersion))
        #expect(info["spec"]?["interactive"] == .bool(false))
        #expect(info["spec"]?["cluster"]?["server"] == .string(server.url))
        #expect(info["spec"]?["cluster"]?["certificate-authority-data"] == .string(pki.base64(pki.caCert)))
    }

    @Test("exec plugin that fails: exit 77 with its stderr; one that is missing: the install hint")
    func execPluginFailures() async throws {
        let ws = try Workspace()
        try ws.write("fail.sh", "#!/bin/sh\necho 'error: you must be logged in to the identity provider' >&2\nexit 1\n", executable: true)
        let failing = try ws.write("failing", kubeconfig(server: "https://127.0.0.1:1",
            clusterFields: "certificate-authority: \(pki.caCert)",
            userFields: "exec:\n  apiVersion: client.authentication.k8s.io/v1\n  command: ./fail.sh\n  interactiveMode: IfAvailable"))
        let e1 = try #require(await loadError(.init(kubeconfig: failing), ws.environment()))
        #expect(e1.exitCode == 77)
        #expect(e1.description.contains("failed with exit status 1: error: you must be logged in"))

        let missing = try ws.write("missing", kubeconfig(server: "https://127.0.0.1:1",
            clusterFields: "certificate-authority: \(pki.caCert)",
            userFields: "exec:\n  apiVersion: client.authentication.k8s.io/v1\n  command: no-such-auth-plugin\n  installHint: Install it with apt-get install no-such-auth-plugin"))
        let e2 = try #require(await loadError(.init(kubeconfig: missing), ws.environment()))
        #expect(e2.exitCode == 64)
        #expect(e2.description.contains("no-such-auth-plugin"))
        #expect(e2.description.contains("not found on PATH. Install it with apt-get"))

        try ws.write("wrongversion.sh", "#!/bin/sh\necho '{\"kind\":\"ExecCredential\",\"apiVersion\":\"client.authentication.k8s.io/v1beta1\",\"status\":{\"token\":\"x1234\"}}'\n", executable: true)
        let wrong = try ws.write("wrong", kubeconfig(server: "https://127.0.0.1:1",
            clusterFields: "certificate-authority: \(pki.caCert)",
            userFields: "exec:\n  apiVersion: client.authentication.k8s.io/v1\n  command: ./wrongversion.sh\n  interactiveMode: Never"))
        let e3 = try #require(await loadError(.init(kubeconfig: wrong), ws.environment()))
        #expect(e3.exitCode == 77)
        #expect(e3.description.contains("apiVersion other than the client.authentication.k8s.io/v1"))
        #expect(!e3.description.contains("x1234"))
    }

    @Test("exec plugin that returns a client certificate and key")
    func execPluginClientCertificate() async throws {
        let clientCert = try NIOSSLCertificateLoader.load(pki.clientCert)
        let cluster = FakeCluster.standard
        let server = try await TestAPIServer.start(clientCA: pki.caCert) { r in
            r.clientCertificate == clientCert ? cluster.reply(r)! : .json(401, status(401, "Unauthorized", "Unauthorized"))
        }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        func jsonString(_ s: String) -> String { s.replacingOccurrences(of: "\n", with: "\\n") }
        try ws.write("cred.json", """
            {"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","status":{"clientCertificateData":"\(jsonString(pki.read(pki.clientCert)))","clientKeyData":"\(jsonString(pki.read(pki.clientKey)))"}}
            """)
        try ws.write("plugin.sh", "#!/bin/sh\ncat \"\(ws.path)/cred.json\"\n", executable: true)
        let config = try ws.write("config", kubeconfig(server: server.url,
            clusterFields: "certificate-authority: \(pki.caCert)",
            userFields: "exec:\n  apiVersion: client.authentication.k8s.io/v1\n  command: \(ws.path)/plugin.sh\n  interactiveMode: Never"))
        let objects = try await KubernetesSource.load(.init(kubeconfig: config), environment: ws.environment())
        #expect(objects.services.count == 5)
    }

    @Test("exec plugin whose token the server rejects is run once more, as client-go does")
    func execPluginRerunOn401() async throws {
        let server = try await TestAPIServer.start(handler: serving(.standard, token: "fresh-token-2"))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        // First run: a stale cached token; second run: a fresh one.
        try ws.write("plugin.sh", """
            #!/bin/sh
            n=$(cat "\(ws.path)/runs" 2>/dev/null || echo 0); n=$((n+1)); echo $n > "\(ws.path)/runs"
            if [ $n -eq 1 ]; then t=stale-token-1; else t=fresh-token-2; fi
            echo "{\\"kind\\":\\"ExecCredential\\",\\"apiVersion\\":\\"client.authentication.k8s.io/v1\\",\\"status\\":{\\"token\\":\\"$t\\"}}"

            """, executable: true)
        let config = try ws.write("config", kubeconfig(server: server.url,
            clusterFields: "certificate-authority: \(pki.caCert)",
            userFields: "exec:\n  apiVersion: client.authentication.k8s.io/v1\n  command: ./plugin.sh\n  interactiveMode: Never"))
        let objects = try await KubernetesSource.load(.init(kubeconfig: config), environment: ws.environment())
        #expect(objects.services.count == 5)
        #expect(try String(contentsOfFile: "\(ws.path)/runs", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines) == "2")
        #expect(server.requests.first?.authorization == "Bearer stale-token-1")
        #expect(server.requests.dropFirst().allSatisfy { $0.authorization == "Bearer fresh-token-2" })
    }

    @Test("in-cluster: found from the environment and the mounted service account; the token is re-read when it rotates")
    func inClusterWithRotation() async throws {
        let ws = try Workspace()
        let sa = "\(ws.path)/serviceaccount"
        try ws.write("serviceaccount/token", "first-token-aaaa\n")
        try ws.write("serviceaccount/ca.crt", pki.read(pki.caCert))
        try ws.write("serviceaccount/namespace", "kube-system")
        let cluster = FakeCluster.standard
        let accepted = Box("first-token-aaaa")
        let tokenPath = "\(sa)/token"
        let server = try await TestAPIServer.start { r in
            guard r.authorization == "Bearer \(accepted.get())" else {
                return .json(401, status(401, "Unauthorized", "Unauthorized"))
            }
            // After the first page the kubelet rotates the token: only the new one is valid from now on.
            if accepted.get() == "first-token-aaaa" {
                try? "second-token-bbbb".write(toFile: tokenPath + ".new", atomically: true, encoding: .utf8)
                _ = rename(tokenPath + ".new", tokenPath)
                accepted.set("second-token-bbbb")
            }
            return cluster.reply(r)!
        }
        defer { Task { await server.stop() } }
        // A kubeconfig is there too, but in a pod the in-cluster configuration wins.
        try ws.write("home/.kube/config", kubeconfig(server: "https://192.0.2.1:6443", clusterFields: "", userFields: "token: x"))
        let env = ws.environment(["KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": String(server.port)])
        let options = KubernetesSourceOptions(serviceAccountDirectory: sa)
        #expect(try KubernetesSource.describeSource(options, environment: env) == "in-cluster configuration, server \(server.url)")
        let objects = try await KubernetesSource.load(options, environment: env)
        #expect(objects.services.count == 5 && objects.endpointSlices.count == 5)
        #expect(server.requests.first?.authorization == "Bearer first-token-aaaa")
        #expect(server.requests.last?.authorization == "Bearer second-token-bbbb")
    }

    @Test("in-cluster over IPv6: KUBERNETES_SERVICE_HOST=::1")
    func inClusterIPv6() async throws {
        guard let server = try? await TestAPIServer.start(host: "::1", handler: serving(.standard)) else {
            return  // no IPv6 loopback in this sandbox
        }
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        try ws.write("sa/token", testToken)
        try ws.write("sa/ca.crt", pki.read(pki.caCert))
        let env = ws.environment(["KUBERNETES_SERVICE_HOST": "::1", "KUBERNETES_SERVICE_PORT": String(server.port)])
        let objects = try await KubernetesSource.load(.init(serviceAccountDirectory: "\(ws.path)/sa"), environment: env)
        #expect(objects.services.count == 5)
    }

    @Test("in-cluster without ca.crt is refused, never connected unverified")
    func inClusterWithoutCA() async throws {
        let ws = try Workspace()
        try ws.write("sa/token", testToken)
        let env = ws.environment(["KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": "6443"])
        let error = try #require(await loadError(.init(serviceAccountDirectory: "\(ws.path)/sa"), env))
        #expect(error.exitCode == 64)
        #expect(error.description.contains("refusing to connect without verifying the API server"))
    }

    @Test("KUBECONFIG lists merge as kubectl does; relative paths resolve against each file's folder")
    func kubeconfigMerging() async throws {
        let server = try await TestAPIServer.start(handler: serving(.standard))
        defer { Task { await server.stop() } }
        let ws = try Workspace()
        // a/config: cluster "prod" with a relative CA path and a user with a relative tokenFile; no current-context.
        try ws.write("a/certs/ca.crt", pki.read(pki.caCert))
        try ws.write("a/secrets/token", testToken + "\n")
        try ws.write("a/config", """
            apiVersion: v1
            kind: Config
            clusters:
            - name: prod
              cluster:
                server: \(server.url)
                certificate-authority: certs/ca.crt
            users:
            - name: ops
              user:
                tokenFile: secrets/token
            contexts:
            - name: prod
              context: {cluster: prod, user: ops}

            """)
        // b/config: redefines "prod" and "ops" (ignored: a/config came first) and sets current-context (used:
        // a/config set none). Its own context "other" points at its own cluster.
        try ws.write("b/config", """
            apiVersion: v1
            kind: Config
            current-context: prod
            clusters:
            - name: prod
              cluster:
                server: https://192.0.2.99:6443
                certificate-authority: /nonexistent/ca.crt
            - name: other
              cluster:
                server: https://127.0.0.1:1
                certificate-authority: ca-other.crt
            users:
            - name: ops
              user:
                token: wrong-token-from-b
            contexts:
            - name: prod
              context: {cluster: other, user: ops}
            - name: other
              context: {cluster: other, user: ops}

            """)
        try ws.write("b/ca-other.crt", pki.read(pki.otherCACert))
        let env = ws.environment(["KUBECONFIG": "\(ws.path)/missing/config::\(ws.path)/a/config:\(ws.path)/b/config"])
        #expect(try KubernetesSource.describeSource(.init(), environment: env)
                == "kubeconfig \(ws.path)/a/config:\(ws.path)/b/config (context \"prod\"), server \(server.url)")
        let objects = try await KubernetesSource.load(.init(), environment: env)
        #expect(objects.services.count == 5)

        // --context picks b's own context, whose relative CA path resolves against b/.
        let other = try KubernetesSource.resolveConnection(.init(context: "other"), environment: env)
        guard case .certificateAuthority(let ca) = other.trust else { Issue.record("no CA"); return }
        #expect(ca.origin == "\(ws.path)/b/ca-other.crt")
        #expect(other.server == ServerAddress(scheme: "https", host: "127.0.0.1", port: 1))

        let missing = try #require(await loadError(.init(context: "staging"), env))
        #expect(missing.exitCode == 64)
        #expect(missing.description.contains("context \"staging\" not found (contexts: \"prod\", \"other\")"))
    }

    @Test("no in-cluster environment and no kubeconfig: exit 64 with a message that says how to give one")
    func noConfiguration() async throws {
        let ws = try Workspace()
        let error = try #require(await loadError(.init(), ws.environment()))
        #expect(error.kind == .noConfiguration)
        #expect(error.exitCode == 64)
        #expect(error.description.contains("--kubeconfig"))
        #expect(error.description.contains("KUBECONFIG"))
        #expect(error.description.contains("\(ws.path)/home/.kube/config"))

        let explicit = try #require(await loadError(.init(kubeconfig: "\(ws.path)/nope"), ws.environment()))
        #expect(explicit.exitCode == 64)
        #expect(explicit.description.contains("\(ws.path)/nope: no such file"))

        let podWithoutToken = try #require(await loadError(.init(serviceAccountDirectory: "\(ws.path)/none"),
            ws.environment(["KUBERNETES_SERVICE_HOST": "192.0.2.1", "KUBERNETES_SERVICE_PORT": "443"])))
        #expect(podWithoutToken.description.contains("automountServiceAccountToken"))

        let badNamespace = try #require(await loadError(.init(namespaces: ["Bad/../x"]), ws.environment()))
        #expect(badNamespace.exitCode == 64)
    }

    @Test("kubeconfig errors name the file and the stanza, and never print a token")
    func kubeconfigErrors() async throws {
        let ws = try Workspace()
        let noServer = try ws.write("c1", "clusters:\n- name: x\n  cluster: {}\ncontexts:\n- name: x\n  context: {cluster: x}\ncurrent-context: x\n")
        let e1 = try #require(await loadError(.init(kubeconfig: noServer), ws.environment()))
        #expect(e1.description == "kubeconfig \(noServer): cluster \"x\": server: missing")
        let noCurrent = try ws.write("c2", "contexts:\n- name: a\n  context: {cluster: x}\n")
        let e2 = try #require(await loadError(.init(kubeconfig: noCurrent), ws.environment()))
        #expect(e2.description.contains("no current-context is set; pass --context NAME (contexts: \"a\")"))
        let badYAML = try ws.write("c3", "users:\n- name: u\n  user:\n    token: \(testToken)\n   bad: [\n")
        let e3 = try #require(await loadError(.init(kubeconfig: badYAML), ws.environment()))
        #expect(e3.exitCode == 64)
        #expect(!e3.description.contains(testToken))
        let both = try ws.write("c4", kubeconfig(server: "https://127.0.0.1:1",
            clusterFields: "certificate-authority: \(pki.caCert)\ninsecure-skip-tls-verify: true", userFields: "token: t"))
        let e4 = try #require(await loadError(.init(kubeconfig: both), ws.environment()))
        #expect(e4.description.contains("insecure-skip-tls-verify"))
        let provider = try ws.write("c5", kubeconfig(server: "https://127.0.0.1:1", clusterFields: "",
            userFields: "auth-provider:\n  name: gcp\n  config: {}"))
        let e5 = try #require(await loadError(.init(kubeconfig: provider), ws.environment()))
        #expect(e5.description.contains("use an exec credential plugin"))
    }
}

import NIOSSL
enum NIOSSLCertificateLoader {
    static func load(_ path: String) throws -> NIOSSLCertificate { try NIOSSLCertificate.fromPEMFile(path)[0] }
}
