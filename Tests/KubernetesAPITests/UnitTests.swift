import Testing
@testable import KubernetesAPI

@Suite("Kubernetes API: small pieces")
struct UnitTests {
    @Test func serverAddresses() {
        #expect(ServerAddress(parsing: "https://192.0.2.1:6443") == ServerAddress(scheme: "https", host: "192.0.2.1", port: 6443))
        #expect(ServerAddress(parsing: "https://[2001:db8::1]:6443/k8s/clusters/c-1/")
                == ServerAddress(scheme: "https", host: "2001:db8::1", port: 6443, basePath: "/k8s/clusters/c-1"))
        #expect(ServerAddress(parsing: "api.example")?.display == "https://api.example:443")
        #expect(ServerAddress(parsing: "http://127.0.0.1:8001")?.port == 8001)
        #expect(ServerAddress(parsing: "ftp://x") == nil)
        #expect(ServerAddress(parsing: "https://x:99999") == nil)
        #expect(ServerAddress(parsing: "https://[2001:db8::1]:443")?.display == "https://[2001:db8::1]:443")
    }

    @Test func percentEncoding() {
        #expect(percentEncode("app in (a,b),!x") == "app%20in%20%28a%2Cb%29%2C%21x")
        #expect(percentEncode("eyJ2+/=") == "eyJ2%2B%2F%3D")
    }

    @Test func namespaceNames() {
        #expect(KubernetesSource.isDNSLabel("kube-system"))
        #expect(!KubernetesSource.isDNSLabel("Kube"))
        #expect(!KubernetesSource.isDNSLabel("a/b"))
        #expect(!KubernetesSource.isDNSLabel("-a"))
        #expect(!KubernetesSource.isDNSLabel(""))
    }

    @Test func redaction() {
        let e = KubernetesAPIError(.unauthorized, "token abcd1234 was rejected").redacting(["abcd1234"])
        #expect(e.description == "token <redacted> was rejected")
        #expect(e.exitCode == 77)
    }
}
