package analyze

import (
	"strings"

	"github.com/trustmesh/trustmesh/mesh"
)

const peerAuthKind = "PeerAuthentication "

var peerAuthAnalyzer = Analyzer{
	Code: "TMA030",
	Name: "peer-authentication",
	Description: "A PeerAuthentication that is not STRICT: trustmesh never honours it and keeps STRICT mTLS in force, " +
		"so the object says something the mesh does not do.",
	Run: func(in *Input) ([]Finding, string) {
		if in.Mesh == nil {
			return nil, noMesh
		}
		var out []Finding
		for _, r := range in.Mesh.Refusals {
			if strings.HasPrefix(r.Object, peerAuthKind) {
				out = append(out, refusalFinding(r))
			}
		}
		return out, ""
	},
}

// peerAuthField names the first field the refusal names ("mtls.mode ..." or
// "portLevelMtls[8080].mode ...").
func peerAuthField(r mesh.Refusal) string {
	f, _, _ := strings.Cut(r.Reason, " ")
	if strings.HasPrefix(f, "mtls.") || strings.HasPrefix(f, "portLevelMtls[") {
		return "spec." + f
	}
	return ""
}

var refusalsAnalyzer = Analyzer{
	Code: "TMA031",
	Name: "ignored-mesh-object",
	Description: "A mesh object trustmesh reads but refuses to honour (a ServiceEntry it cannot serve, a Gateway server " +
		"it cannot configure); the message is the mesh's refusal.",
	Run: func(in *Input) ([]Finding, string) {
		if in.Mesh == nil {
			return nil, noMesh
		}
		var out []Finding
		for _, r := range in.Mesh.Refusals {
			if !strings.HasPrefix(r.Object, peerAuthKind) { // else TMA030
				out = append(out, refusalFinding(r))
			}
		}
		return out, ""
	},
}

// refusalFinding is the finding of a mesh refusal: TMA030 for a
// PeerAuthentication, TMA031 for any other object. The analyzers report
// the refusals of the mesh they read, the loader those of the mesh objects
// among -f's documents.
func refusalFinding(r mesh.Refusal) Finding {
	if strings.HasPrefix(r.Object, peerAuthKind) {
		return Finding{
			Code: "TMA030", Severity: SeverityWarning, Object: r.Object, Field: peerAuthField(r),
			Message: r.Reason + ". Traffic stays mTLS whatever it says: set mode STRICT, or delete it once no workload " +
				"outside the mesh needs plaintext (there, trustmesh refuses it anyway)",
		}
	}
	return Finding{Code: "TMA031", Severity: SeverityWarning, Object: r.Object, Message: r.Reason}
}
